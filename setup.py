from setuptools import find_packages, setup

setup(
    name="torch_tpu_estimator",
    version="0.1.0",
    description="TensorFlow's TPUEstimator pattern for PyTorch/XLA: model_fn + input_fn, then "
    "train, evaluate, predict and export on TPU, XLA:CPU or plain PyTorch.",
    packages=find_packages(include=["torch_tpu_estimator", "torch_tpu_estimator.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.9.0",
        "torch-xla==2.9.0",
        "numpy",
        "tensorboardX",
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "ruff", "tensorboard"],
        "examples": ["scikit-learn"],
        "tf": ["tensorflow-cpu"],
        "bench": ["lightning"],
    },
)
