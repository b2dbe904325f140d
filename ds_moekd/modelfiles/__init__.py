"""Model folders: where they are (`demo:` assets, folders, Hugging Face ids in the local cache), checks
before loading, and pickle-to-safetensors conversion."""
