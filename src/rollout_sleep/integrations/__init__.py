"""Optional integrations (W&B, TRL): each imports its library lazily."""
