"""Evaluation of a pretrained backbone against the same architecture at random init.

One concept a module:
  data.py       labelled images and objects read from shards (ShardDataset), resized and
                split deterministically
  features.py   frozen features in batches: pooled maps (image level) and RoIAlign over
                ground-truth boxes (object level), at every feature level
  knn.py        weighted kNN top-1 (InstDisc / solo-learn voting)
  linear.py     multinomial logistic regression, full-batch L-BFGS, fixed L2
  bootstrap.py  95% percentile bootstrap CIs, paired over test items for differences
  probes.py     every probe for pretrained and random networks -> summary rows
  page.py       the self-contained HTML page (tables + inline SVG plots)
  online.py     OnlineEval, the trainer callback (object-crop kNN every N steps)
Entry point: `python -m train.evaluate RUN` (train/evaluate.py)."""
