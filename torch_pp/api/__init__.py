"""The OpenAI-compatible server on rank 0: ``engine`` runs requests on the pipeline, ``app`` speaks HTTP."""
