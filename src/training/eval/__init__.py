"""Evaluation suite of clip-kd, one concern per module.

- `datasets`: benchmark formats read from disk (ImageNet family, CIFAR, STL-10, Pets, image folders, CLIP_benchmark
  WebDataset, Karpathy retrieval JSON, CSV)
- `templates`: class names and prompt templates; `imagenet_wnids.txt` the sorted 1000 ImageNet wnids
- `engine`: data-parallel embedding (shard, encode, gather back in dataset order) and evaluation's autocast
- `zeroshot`, `retrieval`, `linear_probe`: the three tasks
- `results`: CLIP_benchmark JSON files; `report`: teacher-vs-student retention table and chart
- `loading`: models from open_clip names / JSON configs and checkpoints (weights_only)
- `suite`: the command line's jobs (plan, run for one model, write records); `cli`: `python -m training.eval`
- `hook`: `TrainingEvaluator`, evaluation during training
"""
