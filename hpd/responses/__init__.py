"""Response sources: what the student is trained on after each prompt (the dataset's completion,
the teacher's generations, the student's rollouts, a mix) and the generation backends.
"""
