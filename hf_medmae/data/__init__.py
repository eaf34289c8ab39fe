"""The data layer: reading images and volumes, lazy pools, seeded splits and augmentation, datasets per task.

One module per concept: `io` (readers), `sources` (lazy pre-training pools), `image_set` (images or volumes with
optional label maps, lazy or in memory), `crops` (tiles, sliding windows and random crops in 2D and 3D), `volumes`
(3D readers and data keys), `dicom` (DICOM series as NIfTI images in RAS mm), `embedded` (the data that ships
inside installed packages), `splits` (every seeded split), `transforms` (normalisation and seeded augmentation),
`stain` (stain colour: HED jitter, Reinhard normalisation), `boxes` (objects cut from box annotations), and the
data of each task (`pretraining`, `classification`, `segmentation`).
"""
