"""Fine-tuning: data reading, chat-template collation with label masking, Trainer + peft, plots."""
