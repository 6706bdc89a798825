"""The data: where images and labels come from, and the input pipeline that feeds a task.

    sources      --dataset to train/validation/test splits (TFDS, IDX, npz, the packaged sample)
    tfds_source  TFDS's download and preparation, its failures as one line
    image_files  a user's images (PNG, JPEG, GIF, BMP, .npy, .npz) for prediction
    pipeline     the sharded tf.data pipeline: per-replica batches, labels as a dict by head
"""
