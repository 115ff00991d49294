"""Wire contract v1: message models, topics, envelope codec. Imports nothing else of homenet."""

from .envelope import MAX_PAYLOAD, ContractError, Envelope, canonical, decode, encode, signed_by
from .messages import *  # noqa: F401,F403  (the models are the contract)
from .topics import DEFAULT_ROOT, DeviceTopic, Topics, TopicError, check_device_id

__all__ = ["MAX_PAYLOAD", "ContractError", "Envelope", "canonical", "decode", "encode", "signed_by",
           "DEFAULT_ROOT", "DeviceTopic", "Topics", "TopicError", "check_device_id"]
