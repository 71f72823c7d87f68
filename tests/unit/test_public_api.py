from __future__ import annotations

import inspect

import llamaproc
import llamaproc._exceptions as exceptions


def test_all_is_sorted_and_complete() -> None:
    assert llamaproc.__all__ == sorted(llamaproc.__all__)
    public = {name for name in dir(llamaproc) if not name.startswith("_")} - {"sync", "testing"}
    # Submodules imported as a side effect are not API.
    public = {name for name in public if not inspect.ismodule(getattr(llamaproc, name))}
    assert public == set(llamaproc.__all__) - {"__version__"}


def test_public_objects_report_the_package_as_their_module() -> None:
    for name in llamaproc.__all__:
        obj = getattr(llamaproc, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "llamaproc", name


def test_every_error_derives_from_the_root() -> None:
    errors = [obj for obj in vars(exceptions).values() if inspect.isclass(obj) and issubclass(obj, BaseException)]
    assert len(errors) > 10
    for error in errors:
        assert issubclass(error, llamaproc.LlamaprocError), error
    for name in exceptions.__all__:
        assert name in llamaproc.__all__, f"{name} is not exported"


def test_misuse_errors_are_runtime_errors() -> None:
    assert issubclass(llamaproc.ClosedError, RuntimeError)
