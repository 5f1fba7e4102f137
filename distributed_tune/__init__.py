"""distributed_tune: fine-tune Hugging Face encoders on CoLA across many GPUs (or CPUs).

    python -m distributed_tune --config configs/cola_bert_base.yaml
"""

__version__ = "0.1.0"
