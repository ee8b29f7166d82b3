"""Training data: rows from files and the Hub, their encoding with label masks, batches, packing,
the streamed source and the resumable order.
"""
