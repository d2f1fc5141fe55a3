"""Federated fine-tuning on Flower (issue 12).

Phone side (numpy + ai-edge-litert + flwr; no JAX, no TensorFlow): ``adapter`` (the wire
contract), ``local`` (a round of local training on a LiteRT bundle with ``DeviceTrainer``),
``profiles`` (device profiles: speed, memory, battery, network, availability),
``client_app`` (the Flower ClientApp). Server side: ``aggregate`` (the LoRA aggregation
math), ``strategies`` (FedAvg, FedProx, FedAdam, FlexLoRA, FFA-LoRA, SplitLoRA), ``split``
(SplitLoRA's server half: the layers after the cut, in JAX, behind HTTP), ``server_app``
(the Flower ServerApp: evaluation, atomic per-round checkpoints, resume, one JSONL log),
``partition`` / ``tasks`` (federated data splits; the WordNet multiple-choice task),
``recipe`` and ``cli`` (``mobiletune fed run``). This file imports nothing, so the phone
can import ``mobiletune.fed.client_app`` without the server's modules.
"""
