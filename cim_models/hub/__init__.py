"""Publishing CIM weights: the DALL-E tokenizer conversion, the export of a pre-training checkpoint to a
Hub repo folder, its model card, and the upload."""
