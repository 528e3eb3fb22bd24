"""Every public function has a docstring with Args, Returns and an Example, and the examples run (doctest)."""
import doctest
import inspect

import pytest

import target_param as tp
import target_param.benchmark
import target_param.convert

PUBLIC = [tp.to_target_space, tp.to_weight_space, tp.is_target_space, tp.explain, tp.realisations,
          target_param.benchmark.benchmark,
          tp.convert.realisers]


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__name__)
def test_public_function_documents_args_returns_and_an_example(fn):
    doc = inspect.getdoc(fn)
    for section in ("Args:", "Returns:", "Example:", ">>> "):
        assert section in doc, (fn.__name__, section)


@pytest.mark.parametrize("module", [tp.convert, target_param.benchmark], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert attempted >= (6 if module is tp.convert else 1) and failed == 0
