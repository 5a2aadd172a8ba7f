"""Teacher-output caches: a teacher's logits on recorded augmented views, computed once, read by ``distill``.

``kdforge cache build RECIPE`` fills ``method.cache``'s folder; ``kdforge train RECIPE`` then reads the logits
of each (sample, view) instead of running the teacher. See docs/teacher-cache.md.
"""

from kdforge.cache.build import BuildResult, build, build_from_recipe, cache_path, identity, open_for
from kdforge.cache.config import TeacherCacheConfig
from kdforge.cache.store import StaleCache, TeacherCache, list_caches, teacher_hash
from kdforge.cache.topk import compress_topk, expand_topk

__all__ = ["BuildResult", "StaleCache", "TeacherCache", "TeacherCacheConfig", "build", "build_from_recipe",
           "cache_path", "compress_topk", "expand_topk", "identity", "list_caches", "open_for", "teacher_hash"]
