"""Small utilities shared by every stage: atomic files, sample keys, progress, work paths."""
