"""Model loading. Import from :mod:`facellm_cli.models.loader`; torch is imported lazily."""
