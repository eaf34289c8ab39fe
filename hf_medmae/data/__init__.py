"""The data layer: reading images and volumes, lazy pools, seeded splits and augmentation, datasets per task.

One module per concept: `io` (readers), `sources` (lazy image pools and tiles), `volumes` (3D volumes, intensity,
crops), `embedded` (the data that ships inside installed packages), `splits` (every seeded split), `transforms`
(normalisation and seeded augmentation), and the data of each task (`pretraining`, `classification`, `segmentation`).
"""
