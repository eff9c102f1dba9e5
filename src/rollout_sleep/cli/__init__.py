"""``rollout-sleep``: the command line (:mod:`.main`) and its commands' code: :mod:`.demo`, :mod:`.soak`.

The top floor: may import anything of the package; nothing imports it.
"""
