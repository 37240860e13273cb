"""Install the `bevfusion` package.

torch is pinned by the install step (see the Makefile), not here, so that the package also installs
next to an existing CUDA build of torch.
"""
from setuptools import find_packages, setup

NUSCENES = [
    "nuscenes-devkit==1.2.0",  # pins numpy<2
    "numpy<2",
    "pyarrow<26",
    "shapely>=2.0",
]
VIZ = ["rerun-sdk>=0.23,<0.24"]
DEV = [
    "pytest>=7",
    "pytest-timeout",
    "pytest-xdist",
    "shapely>=2.0",
    "spconv==2.3.8",  # test oracle and benchmark peer only
]

setup(
    name="bevfusion",
    version="0.1.0",
    description="Camera + LiDAR BEV perception (after MIT HAN Lab's BEVFusion), pure pip install",
    python_requires=">=3.11",
    packages=find_packages(include=["bevfusion", "bevfusion.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "numpy>=1.23",
        "pyyaml>=6",
        "tqdm>=4.60",
        "pillow>=9",
        "scipy>=1.10",
        "numba>=0.58",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "nuscenes": NUSCENES,
        "viz": VIZ,
        "dev": DEV,
        "all": NUSCENES + VIZ + DEV,
    },
)
