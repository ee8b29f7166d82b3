"""Models: loading and saving (HF directories, Hub ids, GGUF, tiny models with a byte tokenizer),
the LM-head view the chunked losses read, students built from a teacher's layers.
"""
