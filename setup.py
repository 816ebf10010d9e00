"""relkd: knowledge-distilled contextual relevance models for product search, as a TFX pipeline.

The pinned dependency stack lives in requirements.txt and is installed with
``--no-deps --ignore-requires-python`` (see ../shared/env/README.md for why):
tfx 1.15 declares Requires-Python < 3.11 although every wheel it needs exists
for 3.11, so ``install_requires`` here only names the direct imports and is
not used to resolve versions.
"""
from setuptools import find_packages, setup

setup(
    name="relkd",
    version="0.1.0",
    description=(
        "TFX pipeline for e-commerce search relevance: BERT teacher, "
        "graph-context BERM student, TFMA gates, TF Serving."
    ),
    python_requires=">=3.11,<3.12",
    packages=find_packages(
        include=["pipeline*", "components*", "trainer*", "schemas*", "kubeflow*"]
    ),
    package_data={"schemas": ["*.pbtxt"], "pipeline": ["profiles/*.yaml"]},
    install_requires=[
        "tfx==1.15.1",
        "tensorflow==2.15.1",
        "apache-beam==2.56.0",
        "PyYAML",
        "scipy",
    ],
    entry_points={"console_scripts": ["relkd=pipeline.cli:main"]},
)
