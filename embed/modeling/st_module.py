"""Base for this package's sentence-transformers modules (latent-attention head, lexical channel).

sentence-transformers loads a module from modules.json by calling `Class.load(path, subfolder=...,
token=..., ...)`; this base resolves the folder (local or hub) and its config once, and hands both to
`from_folder`. Loading any of these through sentence-transformers takes trust_remote_code=True.
"""
from __future__ import annotations

from sentence_transformers.base.modules.module import Module


class PackageModule(Module):
    @classmethod
    def from_folder(cls, folder: str, **config):
        raise NotImplementedError

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs):
        hub_kwargs = {"subfolder": subfolder, "token": token, "cache_folder": cache_folder,
                      "revision": revision, "local_files_only": local_files_only}
        folder = cls.load_dir_path(model_name_or_path, **hub_kwargs)
        return cls.from_folder(folder, **cls.load_config(model_name_or_path, **hub_kwargs))
