// The AWS SDK for Go v1 (Debian's golang-github-aws-aws-sdk-go-dev) driven by
// tests/other_sdks.rs: six calls, one JSON line each (see tests/go/README.md).
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/aws/aws-sdk-go/aws"
	"github.com/aws/aws-sdk-go/aws/awserr"
	"github.com/aws/aws-sdk-go/aws/session"
	"github.com/aws/aws-sdk-go/service/kms"
)

func report(id string, requestID string, err error) {
	line := map[string]interface{}{"id": id, "ok": err == nil, "request_id": requestID}
	if err != nil {
		var tagErr *kms.TagException
		line["typed"] = errors.As(err, &tagErr)
		var failure awserr.RequestFailure
		if errors.As(err, &failure) {
			line["code"] = failure.Code()
			line["message"] = failure.Message()
			line["status"] = failure.StatusCode()
			line["request_id"] = failure.RequestID()
		} else {
			line["message"] = err.Error()
		}
	}
	out, _ := json.Marshal(line)
	fmt.Println(string(out))
}

func tags(pairs ...string) []*kms.Tag {
	var out []*kms.Tag
	for i := 0; i < len(pairs); i += 2 {
		out = append(out, &kms.Tag{TagKey: aws.String(pairs[i]), TagValue: aws.String(pairs[i+1])})
	}
	return out
}

func main() {
	cfg := aws.NewConfig().WithRegion("us-east-1").WithMaxRetries(0)
	if endpoint := os.Getenv("KMS_DRIVER_ENDPOINT"); endpoint != "" {
		cfg = cfg.WithEndpoint(endpoint)
	}
	sess := session.Must(session.NewSession(cfg))
	client := kms.New(sess)
	keyID := os.Getenv("KMS_DRIVER_KEY_ID")

	enc, err := client.Encrypt(&kms.EncryptInput{KeyId: aws.String(keyID), Plaintext: []byte("hello from go v1")})
	report("encrypt", "", err)
	if err == nil {
		dec, err := client.Decrypt(&kms.DecryptInput{CiphertextBlob: enc.CiphertextBlob})
		if err == nil && string(dec.Plaintext) != "hello from go v1" {
			err = fmt.Errorf("decrypted %q", dec.Plaintext)
		}
		report("decrypt", "", err)
	}
	_, err = client.TagResource(&kms.TagResourceInput{KeyId: aws.String(keyID), Tags: tags("team:app", "ledger", "cost:center", "4711")})
	report("tag-allowed", "", err)
	_, err = client.TagResource(&kms.TagResourceInput{KeyId: aws.String(keyID), Tags: tags("Project", "apollo")})
	report("tag-denied", "", err)
	_, err = client.CreateKey(&kms.CreateKeyInput{Description: aws.String("go v1"), Tags: tags("team:owner", "payments")})
	report("create-tagged", "", err)
	_, err = client.CreateKey(&kms.CreateKeyInput{Description: aws.String("go v1, no tags")})
	report("create-untagged", "", err)
}
