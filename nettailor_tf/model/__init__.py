"""The networks and their maths: Keras layers and their BN folding (`layers`),
the ImageNet backbones (`backbones`) and their PyTorch weights read as data
(`pretrained`), the gates (`gates`), proxies and the gated NetTailor block
(`blocks`), the student built from a plan (`student_network`), its expected
and exact cost (`complexity`), the losses (`losses`), pruning: from gates to
a plan, the plan as gate masks, the plan and task weights on disk
(`pruning`), and the static network of a plan that is exported
(`static_graph`).

It may import `common` and `settings` only: never data, training, the run's
bookkeeping or the stages (the layer rules are in tests/test_imports.py).
"""
