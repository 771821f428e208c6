"""recbole_cmr models (RecBole models, looked up by ``recbole_cmr.utils.get_model``)."""
