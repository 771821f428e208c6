"""Context-aware (CTR) recommenders of recbole_cmr (one model per file)."""
