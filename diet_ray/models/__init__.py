"""CTR models over soft-or-hard field inputs. Knows nothing of Ray."""
from diet_ray.models.base import CTRModel, weighted_bce
from diet_ray.models.registry import MODELS, build_model, candidate_name, split_candidate, train_config_for
from diet_ray.schema import Batch, InputSpec

__all__ = ["Batch", "CTRModel", "InputSpec", "MODELS", "build_model", "candidate_name", "split_candidate", "train_config_for", "weighted_bce"]
