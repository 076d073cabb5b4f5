# The AWS SDK for Ruby v3 (Debian's ruby-aws-sdk-kms) driven by tests/other_sdks.rs: six
# calls, one JSON line each (see tests/go/README.md for the lines).
require "json"
require "aws-sdk-kms"

options = { region: "us-east-1", retry_limit: 0 }
endpoint = ENV["KMS_DRIVER_ENDPOINT"].to_s
options[:endpoint] = endpoint unless endpoint.empty?
proxy = ENV["KMS_DRIVER_HTTP_PROXY_OPTION"].to_s
options[:http_proxy] = proxy unless proxy.empty?
client = Aws::KMS::Client.new(options)
key_id = ENV["KMS_DRIVER_KEY_ID"]

def call(id)
  line = { id: id, ok: true }
  begin
    response = yield
    line[:request_id] = response.context.http_response.headers["x-amzn-requestid"]
    response
  rescue Aws::KMS::Errors::ServiceError => e
    line.merge!(ok: false, typed: e.is_a?(Aws::KMS::Errors::TagException), code: e.code,
                message: e.message, status: e.context.http_response.status_code,
                request_id: e.context.http_response.headers["x-amzn-requestid"])
    nil
  rescue StandardError => e
    line.merge!(ok: false, message: "#{e.class}: #{e.message}")
    nil
  ensure
    puts JSON.generate(line)
    $stdout.flush
  end
end

def tags(*pairs)
  pairs.each_slice(2).map { |k, v| { tag_key: k, tag_value: v } }
end

plaintext = "hello from ruby"
enc = call("encrypt") { client.encrypt(key_id: key_id, plaintext: plaintext) }
if enc
  call("decrypt") do
    dec = client.decrypt(ciphertext_blob: enc.ciphertext_blob)
    raise "decrypted #{dec.plaintext.inspect}" unless dec.plaintext == plaintext
    dec
  end
end
call("tag-allowed") { client.tag_resource(key_id: key_id, tags: tags("team:app", "ledger", "cost:center", "4711")) }
call("tag-denied") { client.tag_resource(key_id: key_id, tags: tags("Project", "apollo")) }
call("create-tagged") { client.create_key(description: "ruby", tags: tags("team:owner", "payments")) }
call("create-untagged") { client.create_key(description: "ruby, no tags") }
