"""A local Google Cloud Storage server for the tests: `python tests/gcs_emulator.py PORT BUCKET`.

`gcp-storage-emulator`, with one addition: its media downloads carry the object's generation
in the `x-goog-generation` header, as GCS's do. tensorstore's gcs driver (Orbax's arrays) reads
it; without it every read fails with "Malformed StorageGeneration".
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except NotFound:
    return
  response['x-goog-generation'] = obj['generation']
  response['x-goog-metageneration'] = obj['metageneration']


objects.download = download_with_generation  # objects.get calls it for alt=media
for _, handlers in server.HANDLERS:
  for method, handler in handlers.items():
    if handler is _download:
      handlers[method] = download_with_generation

if __name__ == '__main__':
  port, bucket = int(sys.argv[1]), sys.argv[2]
  server.create_server('localhost', port, in_memory=True, default_bucket=bucket).run()
