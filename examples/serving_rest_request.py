"""Build a TF Serving REST request for a classification export's bytes signature, and answer it locally.

    bit-keras finetune && bit-keras export --run runs/digits-BiT-R14x0.5-mnist5k
    python examples/serving_rest_request.py exports/digits-BiT-R14x0.5-mnist5k/classification IMAGE.png [IMAGE ...]

Writes the request body TF Serving's REST API takes at `POST /v1/models/<name>:predict` to `--body`
(images as `{"b64": ...}`, which TF Serving decodes into the `image_bytes` string tensor; send it with
`curl -d @request.json`), then prints the response TF Serving would send, computed here with the SavedModel.
"""

import argparse
import base64
import json

import tensorflow as tf


def request_body(paths):
    instances = []
    for path in paths:
        with open(path, "rb") as f:
            instances.append({"image_bytes": {"b64": base64.b64encode(f.read()).decode("ascii")}})
    return {"signature_name": "serving_bytes", "instances": instances}


def answer(export, body):
    """What TF Serving does with a row-format request: decode the b64 inputs, batch them, run the signature."""
    signature = tf.saved_model.load(export).signatures[body["signature_name"]]
    image_bytes = [base64.b64decode(instance["image_bytes"]["b64"]) for instance in body["instances"]]
    outputs = signature(image_bytes=tf.constant(image_bytes))
    rows = []
    for i in range(len(image_bytes)):
        row = {key: value[i].numpy().tolist() for key, value in outputs.items()}
        row["labels"] = [label.decode() for label in row["labels"]]
        rows.append(row)
    return {"predictions": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", help="a classification export directory")
    parser.add_argument("images", nargs="+", help="encoded images: JPEG, PNG, GIF or BMP")
    parser.add_argument("--body", default="request.json", help="where to write the request body")
    args = parser.parse_args()
    body = request_body(args.images)
    with open(args.body, "w", encoding="utf-8") as f:
        json.dump(body, f)
    print(json.dumps(answer(args.export, body), indent=2))


if __name__ == "__main__":
    main()
