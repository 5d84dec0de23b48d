"""A BERT-style sentence classifier with TPUEstimator, in the manner of BERT's run_classifier.py.

Everything is small and made here, so it runs in well under a minute on XLA:CPU, with no
download:

  - Text: synthetic movie-review sentences from a small vocabulary: positive and negative words
    among neutral filler (some of it outside the vocabulary, so it becomes [UNK]). The label is
    the kind of sentiment word the sentence holds more of.
  - Tokenizer: whitespace, over a vocabulary built in this file with [PAD], [UNK], [CLS], [SEP];
    each example becomes BERT's features: input_ids, input_mask and segment_ids, padded to
    --max_seq_length.
  - Model: token + position + segment embeddings, a 2-layer torch.nn.TransformerEncoder, the
    [CLS] token's pooled output and a classification head (BERT's shape, hidden size 32).
  - "Pre-training": the encoder is first trained on another task over other sentences of the
    same kind (how many sentiment words a sentence holds: 3 classes, a head of another shape) into
    <model_dir>/pretrained. Fine-tuning then warm starts from that checkpoint, as run_classifier
    does from --init_checkpoint: the encoder and embeddings are taken, and the 3-way head is
    skipped (logged as "Warm start skipped classifier.weight ...") and keeps its fresh init.
  - Fine-tuning: AdamW with weight decay (none on biases and LayerNorm), gradients clipped to
    global norm 1.0, and BERT's learning rate: linear warmup over the first 10% of the steps,
    then linear decay to 0.

Then it evaluates on held-out sentences, predicts, exports for serving with dict features and
serves the same sentences from the export.

    PJRT_DEVICE=CPU python examples/bert_classifier.py --model_dir /tmp/bert
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random

import torch
import torch.nn.functional as F

from torch_tpu_estimator import (
    LossHistory,
    ModeKeys,
    RunConfig,
    TPUConfig,
    TPUEstimator,
    TPUEstimatorSpec,
    UpdateConfig,
    WarmStartSettings,
    load_exported,
    metrics,
)
from torch_tpu_estimator.data import TensorSlices
from torch_tpu_estimator.lr_schedules import PolynomialDecay

POSITIVE_WORDS = ["good", "great", "excellent", "wonderful", "love", "enjoyed", "brilliant", "fun"]
NEGATIVE_WORDS = ["bad", "awful", "terrible", "boring", "hate", "poor", "dull", "worst"]
NEUTRAL_WORDS = ["the", "movie", "film", "was", "a", "and", "it", "plot", "actors", "story", "i",
                 "this", "really", "with", "of", "scene", "music", "ending", "director", "very"]
OUT_OF_VOCABULARY = ["popcorn", "sequel", "cinema", "trailer"]  # in the text, not in the vocab
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


# --- Data: InputExample -> InputFeatures, as run_classifier.py ---------------------------------


@dataclasses.dataclass(frozen=True)
class InputExample:
    """A single training/test example for simple sequence classification."""

    guid: str
    text_a: str
    label: str


class SentimentProcessor:
    """Positive or negative: which kind of sentiment word the sentence holds more of."""

    def get_labels(self) -> list[str]:
        return ["negative", "positive"]

    def label_of(self, positive: int, negative: int) -> str:
        return "positive" if positive > negative else "negative"

    def get_examples(self, set_type: str, count: int, seed: int) -> list[InputExample]:
        rng = random.Random(seed)
        examples = []
        for index in range(count):
            words, positive, negative = _sentence(rng)
            examples.append(InputExample(f"{set_type}-{index}", " ".join(words),
                                         self.label_of(positive, negative)))
        return examples


class SentimentWordCountProcessor(SentimentProcessor):
    """The pre-training task: how many sentiment words the sentence holds (1, 2, 3 or more),
    whatever their polarity. It has another number of labels than the task fine-tuned later."""

    def get_labels(self) -> list[str]:
        return ["one", "two", "three_or_more"]

    def label_of(self, positive: int, negative: int) -> str:
        return ["one", "two", "three_or_more"][min(positive + negative, 3) - 1]


def _sentence(rng: random.Random) -> tuple[list[str], int, int]:
    """A shuffled sentence of 4-13 words: 1-3 words of one sentiment, fewer of the other."""
    dominant = rng.randint(1, 3)
    minority = rng.randint(0, dominant - 1)
    positive, negative = (dominant, minority) if rng.random() < 0.5 else (minority, dominant)
    num_words = rng.randint(max(4, positive + negative), 13)
    filler = [rng.choice(OUT_OF_VOCABULARY) if rng.random() < 0.1 else rng.choice(NEUTRAL_WORDS)
              for _ in range(num_words - positive - negative)]
    words = ([rng.choice(POSITIVE_WORDS) for _ in range(positive)]
             + [rng.choice(NEGATIVE_WORDS) for _ in range(negative)] + filler)
    rng.shuffle(words)
    return words, positive, negative


class FullTokenizer:
    """Whitespace tokenization over a fixed vocabulary; unknown words become [UNK]."""

    def __init__(self):
        self.vocab = {token: index for index, token in enumerate(
            SPECIAL_TOKENS + POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS)}

    def tokenize(self, text: str) -> list[str]:
        return [word if word in self.vocab else "[UNK]" for word in text.lower().split()]

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.vocab[token] for token in tokens]


def convert_examples_to_features(examples: list[InputExample], label_list: list[str],
                                 max_seq_length: int, tokenizer: FullTokenizer
                                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """BERT's features of every example, as tensors: [CLS] tokens [SEP], zero-padded to
    max_seq_length, input_mask 1 on real tokens, segment_ids 0 (one sentence per example)."""
    label_map = {label: index for index, label in enumerate(label_list)}
    input_ids, input_mask, label_ids = [], [], []
    for example in examples:
        tokens = tokenizer.tokenize(example.text_a)[:max_seq_length - 2]
        ids = tokenizer.convert_tokens_to_ids(["[CLS]", *tokens, "[SEP]"])
        padding = max_seq_length - len(ids)
        input_ids.append(ids + [0] * padding)
        input_mask.append([1] * len(ids) + [0] * padding)
        label_ids.append(label_map[example.label])
    features = {"input_ids": torch.tensor(input_ids), "input_mask": torch.tensor(input_mask),
                "segment_ids": torch.zeros(len(examples), max_seq_length, dtype=torch.long)}
    return features, torch.tensor(label_ids)


def input_fn_builder(features: dict[str, torch.Tensor], labels: torch.Tensor | None):
    """An input_fn over the examples: ({"input_ids", "input_mask", "segment_ids"}, label) rows
    (features alone for predict). The estimator batches params["batch_size"] of them, and in
    training repeats and shuffles them, as BERT's d.repeat().shuffle().batch() did."""

    def input_fn(params):
        del params
        return TensorSlices(features if labels is None else (features, labels))

    return input_fn


# --- Model --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 64
    hidden_dropout_prob: float = 0.1
    max_position_embeddings: int = 64
    type_vocab_size: int = 2
    initializer_range: float = 0.02


class BertEmbeddings(torch.nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = torch.nn.Embedding(config.max_position_embeddings,
                                                      config.hidden_size)
        self.token_type_embeddings = torch.nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = torch.nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embeddings = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                      + self.token_type_embeddings(segment_ids))
        return self.dropout(self.LayerNorm(embeddings))


class BertClassifier(torch.nn.Module):
    """BERT (post-LayerNorm encoder, GELU), the [CLS] pooler, and a num_labels-way head."""

    def __init__(self, config: BertConfig, num_labels: int):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        layer = torch.nn.TransformerEncoderLayer(
            config.hidden_size, config.num_attention_heads, config.intermediate_size,
            dropout=config.hidden_dropout_prob, activation="gelu", layer_norm_eps=1e-12,
            batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, config.num_hidden_layers,
                                                   enable_nested_tensor=False)
        self.pooler = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = torch.nn.Dropout(config.hidden_dropout_prob)
        self.classifier = torch.nn.Linear(config.hidden_size, num_labels)
        for module in self.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.trunc_normal_(module.weight, std=config.initializer_range,
                                            a=-2 * config.initializer_range,
                                            b=2 * config.initializer_range)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, input_mask: torch.Tensor,
                segment_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embeddings(input_ids, segment_ids),
                              src_key_padding_mask=input_mask == 0)
        pooled = torch.tanh(self.pooler(hidden[:, 0]))  # the [CLS] token
        return self.classifier(self.dropout(pooled))


def create_model(params: dict) -> BertClassifier:
    return BertClassifier(BertConfig(vocab_size=params["vocab_size"]), params["num_labels"])


def metric_fn(per_example_loss, label_ids, logits):
    predictions = logits.argmax(dim=-1)
    return {"eval_accuracy": metrics.accuracy(labels=label_ids, predictions=predictions),
            "eval_loss": metrics.mean(values=per_example_loss)}


def model_fn(features, labels, mode, config, params, model):
    """The model_fn for TPUEstimator, as run_classifier.py's model_fn_builder returns it."""
    del config  # TF's fifth argument: the RunConfig, not needed here
    logits = model(features["input_ids"], features["input_mask"], features["segment_ids"])
    probabilities = F.softmax(logits, dim=-1)

    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"probabilities": probabilities,
                                                   "class_ids": logits.argmax(dim=-1)})

    per_example_loss = F.cross_entropy(logits, labels, reduction="none")
    if mode == ModeKeys.TRAIN:
        return TPUEstimatorSpec(mode, loss=per_example_loss.mean())
    return TPUEstimatorSpec(mode, loss=per_example_loss,
                            eval_metrics=(metric_fn, [per_example_loss, labels, logits]))


def optimizer_fn(model, params):
    """BERT's optimization.create_optimizer: AdamW (weight decay 0.01, none on biases and
    LayerNorm), warmup then linear decay to 0 over num_train_steps. Clipping to global norm 1.0
    is UpdateConfig(clip_global_norm=1.0)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if "bias" in name or "norm" in name.lower() else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=params["learning_rate"], betas=(0.9, 0.999), eps=1e-6)
    schedule = PolynomialDecay(optimizer, params["num_train_steps"], end_learning_rate=0.0,
                               power=1.0, warmup_steps=params["num_warmup_steps"])
    return optimizer, schedule


# --- The run ------------------------------------------------------------------------------------


def parse_flags(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="runs/bert_classifier",
                        help="The output directory: pretrained/, classifier/ and export/ go there.")
    parser.add_argument("--max_seq_length", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--predict_batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-3,
                        help="The initial learning rate for Adam (large: the model is tiny).")
    parser.add_argument("--pretrain_steps", type=int, default=60)
    parser.add_argument("--num_train_steps", type=int, default=150, help="Fine-tuning steps.")
    parser.add_argument("--warmup_proportion", type=float, default=0.1,
                        help="Proportion of training to perform linear learning rate warmup for.")
    parser.add_argument("--iterations_per_loop", type=int, default=50)
    parser.add_argument("--use_tpu", action=argparse.BooleanOptionalAction, default=True,
                        help="XLA devices (TPU, or XLA:CPU with PJRT_DEVICE=CPU) or plain PyTorch")
    return parser.parse_args(argv)


def make_estimator(flags: argparse.Namespace, model_dir: str, num_labels: int, num_train_steps: int,
                   warm_start_from: WarmStartSettings | None = None) -> TPUEstimator:
    run_config = RunConfig(
        model_dir=model_dir, save_checkpoints_steps=1000,  # run_classifier.py's default
        tpu_config=TPUConfig(iterations_per_loop=flags.iterations_per_loop),
        update_config=UpdateConfig(clip_global_norm=1.0))
    return TPUEstimator(
        model_fn=model_fn,
        model_init_fn=create_model,
        optimizer_fn=optimizer_fn,
        config=run_config,
        params={"vocab_size": len(FullTokenizer().vocab), "num_labels": num_labels,
                "learning_rate": flags.learning_rate, "num_train_steps": num_train_steps,
                "num_warmup_steps": int(num_train_steps * flags.warmup_proportion)},
        use_tpu=flags.use_tpu,
        train_batch_size=flags.train_batch_size,
        eval_batch_size=flags.eval_batch_size,
        predict_batch_size=flags.predict_batch_size,
        warm_start_from=warm_start_from)


def main(argv: list[str] | None = None) -> dict:
    flags = parse_flags(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    tokenizer = FullTokenizer()
    results: dict = {}

    # 1. Pre-train the encoder on another task (counting sentiment words) over other sentences.
    pretrain = SentimentWordCountProcessor()
    features, labels = convert_examples_to_features(
        pretrain.get_examples("pretrain", 2000, seed=1), pretrain.get_labels(),
        flags.max_seq_length, tokenizer)
    pretrained_dir = os.path.join(flags.model_dir, "pretrained")
    pretrainer = make_estimator(flags, pretrained_dir, len(pretrain.get_labels()),
                                flags.pretrain_steps)
    pretrainer.train(input_fn_builder(features, labels), max_steps=flags.pretrain_steps)
    results["pretrained_checkpoint"] = pretrainer.latest_checkpoint()

    # 2. Fine-tune the sentiment classifier from the pre-trained encoder; its 2-way head has
    # another shape than the 3-way one and is skipped (logged), keeping its fresh init.
    processor = SentimentProcessor()
    label_list = processor.get_labels()
    train_features, train_labels = convert_examples_to_features(
        processor.get_examples("train", 2000, seed=2), label_list, flags.max_seq_length, tokenizer)
    dev_examples = processor.get_examples("dev", 400, seed=3)
    dev_features, dev_labels = convert_examples_to_features(
        dev_examples, label_list, flags.max_seq_length, tokenizer)

    classifier_dir = os.path.join(flags.model_dir, "classifier")
    estimator = make_estimator(
        flags, classifier_dir, len(label_list), flags.num_train_steps,
        warm_start_from=WarmStartSettings(pretrained_dir, vars_to_warm_start=".*"))
    train_input_fn = input_fn_builder(train_features, train_labels)
    # BERT's warmup starts at learning rate 0, so the first step moves no weight: a checkpoint
    # after it holds exactly the warm-started model, to compare with the pre-trained one.
    estimator.train(train_input_fn, max_steps=1)
    results["warm_started_checkpoint"] = estimator.latest_checkpoint()
    losses = LossHistory()
    estimator.train(train_input_fn, max_steps=flags.num_train_steps, hooks=[losses])
    results["fine_tuned_checkpoint"] = estimator.latest_checkpoint()
    print(f"fine-tuning loss fell from {losses.first:.3f} to {losses.last:.3f}")
    results.update(first_loss=losses.first, last_loss=losses.last)

    # 3. Evaluate on held-out sentences (the metrics are exact over the padded last batch).
    evaluation = estimator.evaluate(input_fn_builder(dev_features, dev_labels))
    print(f"held-out accuracy {evaluation['eval_accuracy']:.4f}, loss {evaluation['loss']:.4f} "
          f"over {len(dev_examples)} sentences at step {evaluation['global_step']}")
    results.update(accuracy=evaluation["eval_accuracy"], eval_loss=evaluation["loss"],
                   global_step=int(evaluation["global_step"]))

    # 4. Predict a few held-out sentences.
    sentences = {name: value[:10] for name, value in dev_features.items()}
    predictions = list(estimator.predict(input_fn_builder(sentences, None)))
    for example, prediction in zip(dev_examples[:10], predictions, strict=True):
        class_id = int(prediction["class_ids"])
        print(f"{label_list[class_id]:>8} ({100 * float(prediction['probabilities'][class_id]):.1f}%)"
              f"  {example.text_a}")
    results["predictions"] = [int(p["class_ids"]) for p in predictions]
    results["probabilities"] = [p["probabilities"].tolist() for p in predictions]
    results["labels"] = dev_labels[:10].tolist()

    # 5. Export for serving (one example fixes the dict signature) and serve the same sentences.
    export_dir = estimator.export_saved_model(
        os.path.join(flags.model_dir, "export"),
        {name: value[:1] for name, value in dev_features.items()})
    served = load_exported(export_dir)(sentences)
    print(f"exported to {export_dir}; served from the export: {served['class_ids'].tolist()}")
    results.update(export_dir=export_dir, served=served["class_ids"].tolist(),
                   served_probabilities=served["probabilities"].tolist())
    return results


if __name__ == "__main__":
    main()
