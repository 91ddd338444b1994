"""JSON schemas of different shapes for the constrained-decoding tests, each with the question that asks
SmolLM2 for it. Strings, arrays and numbers are bounded so that every output completes within the
tests' max_tokens (an unbounded string lets a small model ramble until the cut)."""
from __future__ import annotations

import json
from typing import Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

NAME = {"type": "string", "minLength": 1, "maxLength": 24}


class Pet(BaseModel):
    """A pydantic model, the way `client.chat.completions.parse(response_format=Pet)` sends it (forbidding
    extra fields, as parse's strict schema does: else a sampled answer may add fields until max_tokens)."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=20)
    species: Literal["cat", "dog", "bird"]
    age_years: int = Field(ge=0, le=30)


SCHEMAS: dict[str, tuple[str, dict]] = {
    "flat": ("Describe a person as JSON.", {
        "type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}),
    "nested": ("Give a person and their address as JSON.", {
        "type": "object", "required": ["name", "address"], "additionalProperties": False,
        "properties": {"name": NAME, "address": {
            "type": "object", "required": ["city", "zip"], "additionalProperties": False,
            "properties": {"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}),
    "array_bounds": ("List some small numbers as JSON.", {
        "type": "object", "required": ["numbers"], "additionalProperties": False,
        "properties": {"numbers": {"type": "array", "minItems": 2, "maxItems": 4,
                                   "items": {"type": "integer", "minimum": 0, "maximum": 99}}}}),
    "enum": ("What colour is the sky? Answer as JSON.", {
        "type": "object", "required": ["colour", "sure"], "additionalProperties": False,
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}}}),
    "pattern": ("Make up a product code as JSON.", {
        "type": "object", "required": ["code"], "additionalProperties": False,
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}}}),
    "numeric_bounds": ("Give a temperature reading as JSON.", {
        "type": "object", "required": ["celsius", "rank"], "additionalProperties": False,
        "properties": {"celsius": {"type": "number", "minimum": -40, "maximum": 50},
                       "rank": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}}),
    "optional": ("Describe a book as JSON.", {
        "type": "object", "required": ["title"], "additionalProperties": False,
        "properties": {"title": NAME, "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
                       "subtitle": NAME}}),
    "defs_ref": ("Give two points as JSON.", {
        "$defs": {"point": {"type": "object", "required": ["x", "y"], "additionalProperties": False,
                            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                           "y": {"type": "integer", "minimum": -9, "maximum": 9}}}},
        "type": "object", "required": ["start", "end"], "additionalProperties": False,
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}}),
    "any_of": ("Give an id, a number or a name, as JSON.", {
        "type": "object", "required": ["id"], "additionalProperties": False,
        "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999}, NAME]}}}),
    "array_of_objects": ("List two fruits with prices as JSON.", {
        "type": "array", "minItems": 1, "maxItems": 2,
        "items": {"type": "object", "required": ["fruit", "price"], "additionalProperties": False,
                  "properties": {"fruit": NAME, "price": {"type": "number", "minimum": 0, "maximum": 100}}}}),
    "nullable": ("Is there a middle name? Answer as JSON.", {
        "type": "object", "required": ["middle_name", "known"], "additionalProperties": False,
        "properties": {"middle_name": {"anyOf": [NAME, {"type": "null"}]}, "known": {"type": "boolean"}}}),
    "pydantic": ("Describe a pet as JSON.", Pet.model_json_schema()),
    "date_format": ("When is the meeting? Answer as JSON.", {
        "type": "object", "required": ["day"], "additionalProperties": False,
        "properties": {"day": {"type": "string", "format": "date"}}}),
    "email_format": ("Give a contact as JSON.", {
        "type": "object", "required": ["name", "email"], "additionalProperties": False,
        "properties": {"name": NAME, "email": {"type": "string", "format": "email", "maxLength": 32}}}),
    "ipv4_format": ("Which server? Answer as JSON.", {
        "type": "object", "required": ["ip"], "additionalProperties": False,
        "properties": {"ip": {"type": "string", "format": "ipv4"}}}),
    "uuid_format": ("Make up an order id as JSON.", {
        "type": "object", "required": ["order_id"], "additionalProperties": False,
        "properties": {"order_id": {"type": "string", "format": "uuid"}}}),
    "const": ("Report the status as JSON.", {
        "type": "object", "required": ["version", "kind", "ok"], "additionalProperties": False,
        "properties": {"version": {"const": 2}, "kind": {"const": "status"}, "ok": {"type": "boolean"}}}),
    "tuple": ("Give a name and a digit as a JSON pair.", {
        "type": "array", "prefixItems": [NAME, {"type": "integer", "minimum": 0, "maximum": 9}],
        "items": False, "minItems": 2}),
    "matrix": ("Give a small grid of digits as JSON.", {
        "type": "object", "required": ["rows"], "additionalProperties": False,
        "properties": {"rows": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}}),
    "deep": ("Describe a company, its boss and the boss's car as JSON.", {
        "type": "object", "required": ["company"], "additionalProperties": False,
        "properties": {"company": {"type": "object", "required": ["boss"], "additionalProperties": False,
                                   "properties": {"boss": {
                                       "type": "object", "required": ["name", "car"], "additionalProperties": False,
                                       "properties": {"name": NAME, "car": {
                                           "type": "object", "required": ["make"], "additionalProperties": False,
                                           "properties": {"make": NAME}}}}}}}}),
    "enum_array": ("Tag this post as JSON.", {
        "type": "object", "required": ["tags"], "additionalProperties": False,
        "properties": {"tags": {"type": "array", "minItems": 1, "maxItems": 3,
                                "items": {"enum": ["news", "sports", "tech", "food"]}}}}),
}


def validate(text: str, schema: dict) -> None:
    """The text parses as JSON and validates against schema, string formats (date, email, ...) included."""
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
