"""Pipeline parallelism over MLX's distributed backend: a model split across the ranks of `mlx.launch`.

partition.py decides which layers each rank holds, stage.py builds and loads one
rank's slice, group.py joins the launched group under a watchdog, pipeline.py
runs the forward pass through the ranks (rank 0 drives the generation loop),
memory.py measures a rank's RSS and returns freed heap before the weights load.
"""
