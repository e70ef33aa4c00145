"""Text conditioning: tokenizers that need no download (:mod:`.tokenizers`) and text encoders behind one
interface, ``encode(prompts) -> (context [B, L, d], mask [B, L])`` (:mod:`.encoders`)."""
from .encoders import ENCODERS, HFTextEncoder, TinyTextEncoder, build_text_encoder
from .tokenizers import BOS, PAD, SPECIALS, UNK, ByteTokenizer, Tokenizer, WordTokenizer, tokenizer_from_state, words

__all__ = ["ENCODERS", "TinyTextEncoder", "HFTextEncoder", "build_text_encoder", "Tokenizer", "WordTokenizer",
           "ByteTokenizer", "tokenizer_from_state", "words", "PAD", "UNK", "BOS", "SPECIALS"]
