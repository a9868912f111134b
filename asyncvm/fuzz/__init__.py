"""`asyncvm fuzz`: generated concurrent ioctl programs, explored under the controlled scheduler."""

from .generate import Program, generate
from .scenario import compile_program, fuzz

__all__ = ["Program", "compile_program", "fuzz", "generate"]
