"""Shim for cffi: `cffi_modules` has no pyproject.toml spelling yet."""
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder", "native/build.py:loadgen_builder"])
