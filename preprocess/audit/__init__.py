"""The dataset audit: how consistent two crops of an image are, and what the pipeline made.

- backbones: which network the statistic runs through (weights lookup, BACKBONE= specs);
- distance:  the per-image statistic (seeded crop pairs, pooled features, d = ||y1 - y2||^2);
- stage:     the statistic as a Ray actor pool, and the job's Stage for it;
- stats:     `make stats` (fill the columns of existing parts);
- gather, gallery, charts: data for the report; report: renders templates/ with Jinja2.
"""
