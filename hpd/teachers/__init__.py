"""Teacher sources: where the teacher's view of a batch comes from (a model in this process, a
top-K cache, a pool of servers, another tokenizer's model, the student itself for OPSD).
"""
