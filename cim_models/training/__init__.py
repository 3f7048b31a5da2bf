"""CIM pre-training: data, objective and trainer around the model layers."""
