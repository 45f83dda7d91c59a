"""The specbeam application: the ``specbeam`` command line (:mod:`.cli`), ``specbeam evaluate``
(:mod:`.evaluation`), ``specbeam dashboard`` (:mod:`.dashboard`), and the model loading they share
(:mod:`.models`).

The library packages (``specbeam_core``, ``specbeam_hf``, ``specbeam_vllm``) never import this
package; this package may use both adapters.
"""
