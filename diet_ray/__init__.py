"""diet_ray: continual dataset distillation for recommender CTR models (DIET), on Ray."""

__version__ = "0.1.0"
