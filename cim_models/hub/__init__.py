"""Publishing CIM weights: the DALL-E tokenizer conversion (``cim-convert-dall-e``), the export of a
pre-training checkpoint to a Hub repo folder with its model card (``cim-export``:
``cim_models.hub.export``, ``cim_models.hub.model_card``), and the upload (``cim-push``:
``cim_models.hub.publish``). The package never imports this subpackage."""
