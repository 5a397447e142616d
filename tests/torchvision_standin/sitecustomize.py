"""Stand-ins for torchvision, for `make old-torch` only (on PYTHONPATH, Python imports this file at
start-up). timm imports torchvision when it is imported, and the only torchvision wheel pip offers
beside torch 2.13 here fails to load ("operator torchvision::nms does not exist"). The tests that
job runs use none of torchvision: every `torchvision.*` module becomes an empty module whose
attributes are distinct placeholder classes (their attributes too: timm keys dicts by enum members).
"""
import importlib.abc
import importlib.machinery
import sys
import types


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        member = _Placeholder(name, (object,), {})
        setattr(cls, name, member)
        return member

    def __getitem__(cls, key):  # subscripted in annotations
        return cls


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = _Placeholder(name, (object,), {"__init__": lambda self, *args, **kwargs: None})
        setattr(self, name, cls)
        return cls


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
