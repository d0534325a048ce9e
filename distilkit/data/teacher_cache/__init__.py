"""An offline teacher cache: the teacher run once over the data, its targets stored compactly in
safetensors shards with a manifest, read back by block so training needs no teacher.

- :mod:`.targets`: :class:`SparseTargets`, what a cache gives back per position;
- :mod:`.codec`: top-k / sampled targets from logits, and their one-byte encoding;
- :mod:`.format`: settings, manifest and shard records, checked when read;
- :mod:`.writer`: :class:`CacheWriter` (resumable, one per process) and :func:`finalize_cache`;
- :mod:`.reader`: :class:`TeacherCache`, which checks a cache against the run and reads targets by block.
"""

from distilkit.data.teacher_cache.reader import TeacherCache
from distilkit.data.teacher_cache.targets import MODES, SparseTargets
from distilkit.data.teacher_cache.writer import CacheWriter, finalize_cache

__all__ = ["MODES", "CacheWriter", "SparseTargets", "TeacherCache", "finalize_cache"]
