"""Benchmarks as a product: the op cases, the training-step overhead and the report.

``fastequiv bench`` (:mod:`.cli`) and the pytest-benchmark suites in ``benchmarks/`` run
the same definitions:

* :mod:`.cases`: every fused op against its pure-torch reference and the tools it
  replaces (e3nn, the plain loop over K), with the bytes each call must move;
* :mod:`.step`: one training step of a non-equivariant point-cloud transformer, plain and
  with each way of measuring equivariance, plus an e3nn-equivariant model of similar size;
* :mod:`.fixed`: the fixed cost of a measuring call on small batches, beyond the model;
* :mod:`.designs`: rotation designs against i.i.d. Haar draws at equal numbers of model
  evaluations, against closed forms (``--ops designs``);
* :mod:`.timing`: how a call is timed (warm-up, a device sync after each call);
* :mod:`.report`: the table, the JSON and the plots.
"""
