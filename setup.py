"""Build script.  Pure-Python package for now; the CUDA extension (fusedres._C) is added here."""

from setuptools import setup

setup()
