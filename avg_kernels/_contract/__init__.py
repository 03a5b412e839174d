"""The backend-neutral contract every layer above builds on (SPEC §0, §3, §6), importing nothing of the
package but ``activations``:

* ``dtypes``: the float dtypes, the compute dtype (float32, or float64 when an operand is float64), the
  Gram's output dtype;
* ``args``: argument checks raising ValueError/TypeError that name the argument;
* ``lists``: the multi-tensor ops' list checks and flat buffers;
* ``outputs``: output allocation (NaN-poisoned under the test suite);
* ``ridge``: the ridge solve's Gram tolerance and error messages.

Layers, each importing only downward (tests/test_layers.py checks it):
``activations`` < ``_contract`` < backends (``reference``, ``_triton``, ``_build``: not each other) < ``ops`` <
``nn`` < ``optim``, ``metrics`` < ``demo``, ``cli``.
"""
