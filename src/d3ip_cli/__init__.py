"""d3ip: diffusion-prior reconstruction of undersampled 3D CT and MRI volumes.

The prior is trained only on synthetic phantoms and adapted to each scan at test
time (D3IP, Chung & Ye, ECCV 2024). This module holds the version only, so that
``d3ip --help`` stays fast.
"""

__version__ = "0.1.0"
