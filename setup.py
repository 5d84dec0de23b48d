import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'^__version__ = "([^"]+)"',
                    Path("torch_tpu_estimator/common/version.py").read_text(), re.M).group(1)

setup(
    name="torch_tpu_estimator",
    version=VERSION,
    description="TensorFlow's TPUEstimator pattern for PyTorch/XLA: model_fn + input_fn, then "
    "train, evaluate, predict and export on TPU, XLA:CPU or plain PyTorch.",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    url="https://github.com/torch-tpu-estimator/torch_tpu_estimator",
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
    packages=find_packages(include=["torch_tpu_estimator", "torch_tpu_estimator.*"]),
    package_data={"torch_tpu_estimator": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        # torch_xla needs the torch release it was built against; 2.9.0 is the pair tested
        "torch==2.9.0",
        "torch-xla==2.9.0",
        "numpy",
        "tensorboardX",
        "tqdm",
    ],
    extras_require={
        # the S3 server the object-storage tests start on localhost, and its client; the docs
        "dev": ["pytest", "pytest-xdist", "ruff", "tensorboard", "moto[server]>=5.0",
                "s3fs>=2024.12", "mkdocs==1.6.1", "mkdocs-material==9.8.2",
                "mkdocstrings-python==2.0.11"],
        "docs": ["mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings-python==2.0.11"],
        # model_dir and exports in buckets: fsspec's conditional create (the lease) is 2024.12+
        "buckets": ["fsspec>=2024.12", "s3fs>=2024.12", "gcsfs>=2024.12"],
        "examples": ["scikit-learn"],
        "tf": ["tensorflow-cpu"],
        "bench": ["lightning"],
    },
)
